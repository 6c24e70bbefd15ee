"""Sizes the broker refuses by closing a channel, known to both sides so that each
refuses them first, with an error that says so."""

#: RabbitMQ 3.10's default max_message_size: a larger message closes the channel
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
#: AMQP short strings (message_id, correlation_id) hold at most this many bytes
MAX_SHORT_STRING = 255
