"""Helpers the tests share: imported from here, never from conftest or from another
test module (tests/test_layers.py checks). Fixtures stay in tests/conftest.py.

- ``configs``: DataSpace configurations, in process on PostgreSQL
  (``inprocess_config``) or remote through the broker (``remote_config``).
- ``contract``: what calls of the DataSpace contract are built from: fresh names
  (``fresh``, ``new_uuid``, ``new_taskmanager``), ``header``, ``metadata``, direct
  SQL (``sql_rows``, ``sql_execute``), extra DataSpaces (``space_factory``), and
  DataSources a configuration names by module path (``RecordingSource``).
- ``lanes``: ordering lanes: a client that routes through them (``lanes_space``,
  ``publish_round``) and the applied-sequence log with its checks
  (``applied_database``, ``check_applied``, ``not_at_last``, ``wait_until_*``).
- ``raw_clients``: bare pika clients that speak the protocol by hand: ``RawClient``
  (any bytes, one reply), ``ReplyClient`` (a direct reply-to consumer).
- ``broker_admin``: the broker from outside the service: its management API
  (``Management``, ``MANAGEMENT_URL``), the committed definitions
  (``DEFINITIONS_FILE``, ``retarget``), ``rabbitmqctl_json``.
- ``urls``: broker URLs made up: a user's (``user_url``), a dead node's (``dead_url``).
- ``worker_process``: ``dataspace-worker`` in a subprocess (``WorkerProcess``).
- ``terminal``: what a command wrote to a pseudo-terminal (``read_terminal``).
- ``value_bombs``: zlib bombs and a process's peak RSS (``peak_rss_mib``), for the
  tests of bounded reads.

The fault tests' own helpers live beside them in tests/faults/ (``instances``,
``cluster``, ``netns``, ``load``, ``lane_load``, ``workers``).
"""
