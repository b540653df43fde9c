"""Every exception kafkaworkers raises, or understands when a handler raises it.

::

    KafkaWorkersError
    ├── ConfigError        a setting is missing or has a bad value
    ├── PluginError        a plugin cannot be loaded, or contradicts another plugin
    ├── BrokerUnavailable  the broker cannot be reached
    ├── DecodeError        bytes that do not decode into the topic's declared type (permanent)
    ├── Retry              raised by a handler: try again later through the retry topics
    ├── PermanentError     raised by a handler: retrying cannot help, dead-letter now
    │   └── MessageTooLarge    a produced message is over the producer's message.max.bytes
    ├── ProducerFatal      the producer hit a fatal error: the worker stops, nothing stored
    ├── CircuitOpenError   a circuit breaker refused the call: pause, never retry or dead-letter
    └── StoreConflict      a state store lost a race or its connection: pause, never retry or dead-letter
"""

from __future__ import annotations


class KafkaWorkersError(Exception):
    """Base of every kafkaworkers error."""


class ConfigError(KafkaWorkersError):
    """A setting is missing or has a bad value; the message names it and says what to do."""


class PluginError(KafkaWorkersError):
    """A plugin cannot be loaded or contradicts another plugin's declarations."""


class BrokerUnavailable(KafkaWorkersError):
    """The broker at the configured bootstrap servers cannot be reached."""


class DecodeError(KafkaWorkersError):
    """A message's bytes do not decode into the type its topic declares.

    Never retried: the same bytes fail the same way every time.
    """


class Retry(KafkaWorkersError):
    """Raised by a handler to have the message tried again after ``delay`` seconds.

    :param delay: seconds to wait at least; ``None`` lets the plugin's backoff decide.
    :param reason: a short, secret-free text kept in the retry headers.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class PermanentError(KafkaWorkersError):
    """Raised by a handler when retrying cannot help: the message goes to the dead-letter topic."""


class MessageTooLarge(PermanentError):
    """A message is larger than the producer or the topic accepts: sending it again cannot help."""


class ProducerFatal(KafkaWorkersError):
    """The producer reported a fatal error (``KafkaError.fatal()``): it cannot produce again.

    The worker stores nothing more and stops, so a supervisor restarts it with a new producer;
    what was not stored is handled again.
    """


class CircuitOpenError(KafkaWorkersError):
    """A circuit breaker refused a call because it is open.

    The worker pauses the partition, rewinds to this message and resumes when the breaker
    lets a probe through; the message is neither retried nor dead-lettered.

    :param breaker: the breaker's name.
    :param retry_at: ``time.monotonic()`` value when the breaker lets a probe through.
    """

    def __init__(self, breaker: str, retry_at: float) -> None:
        super().__init__(f"circuit breaker {breaker!r} is open")
        self.breaker = breaker
        self.retry_at = retry_at


class StoreConflict(KafkaWorkersError):
    """A state store could not finish a transaction for a reason that is not the message's:
    a deadlock or serialization failure with another instance, or a lost database connection.

    What the transaction wrote is rolled back. The worker pauses the partition, rewinds to
    this message and handles it again at ``retry_at``; it is neither retried through the
    retry topics nor dead-lettered, however often it happens.

    :param retry_at: ``time.monotonic()`` value when the message is handled again.
    """

    def __init__(self, message: str, retry_at: float) -> None:
        super().__init__(message)
        self.retry_at = retry_at
