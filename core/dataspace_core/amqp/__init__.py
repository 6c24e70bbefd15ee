"""The AMQP layer both sides share, so that the client's ``RpcClient``, the
worker's consumer pool, the reap schedule, the guarded replies and the
``dataspace`` command connect, reconnect and track confirms the same way.

- ``addresses``: connection parameters for one URL or a cluster's list, built by
  one function (``broker_addresses``), and which address to try next;
- ``reconnect``: the pause before the next connection attempt (``Backoff``) and
  the loop that runs one ``SelectConnection`` after another (``ConnectionLoop``);
- ``confirms``: publisher-confirm bookkeeping (``ConfirmTracker``: delivery tag
  to what was published, ``multiple`` handled);
- ``failures``: a broker failure in one phrase, and whether retrying can help;
- ``patches``: pika work-arounds (a header that would kill a connection, closing
  without a cancel, a SelectConnection's socket reader off and on) and changes
  (frames joined into one send, sent before the next poll; fewer wake-ups);
- ``io_lock``: another thread's turn on a connection while its loop waits in
  the kernel (``IoLock``: the client's callers publish their own requests).
"""
