"""Delivery of notifications: approval requests, reminders and escalations reach people.

The engine writes a ``Notification`` record for each (``<prefix>.notifications`` on
Kafka, the ``notifications`` table on the embedded store). The notifier reads them,
routes each by the delivery settings (``settings``) to webhook endpoints (signed as
Standard Webhooks, ``webhook``) and email addresses (SMTP, ``smtp``), retries failures
with capped, jittered exponential backoff, dead-letters what cannot be delivered, and
delivers each notification once per id and target (``ids``, ``ledger``).

``EmbeddedNotifier`` runs on the embedded store; ``engine.notify.kafka.KafkaNotifier``
with ``engine.notify.postgres.PostgresDeliveryLedger`` on Kafka.
"""

from engine.notify.channel import Delivery, DeliveryError
from engine.notify.deliver import UNDELIVERABLE, Deliverer, NotifierStats, open_deliverer
from engine.notify.embedded import EmbeddedNotifier, NotifierBusyError, SqliteDeliveryLedger
from engine.notify.ids import notification_id
from engine.notify.ledger import DeliveryLedger, Outcome
from engine.notify.routing import ChannelKind, Target, route
from engine.notify.settings import DeliverySettings, SettingsError, load_settings, parse_settings

__all__ = [
    "UNDELIVERABLE",
    "ChannelKind",
    "Deliverer",
    "Delivery",
    "DeliveryError",
    "DeliveryLedger",
    "DeliverySettings",
    "EmbeddedNotifier",
    "NotifierBusyError",
    "NotifierStats",
    "Outcome",
    "SettingsError",
    "SqliteDeliveryLedger",
    "Target",
    "load_settings",
    "notification_id",
    "open_deliverer",
    "parse_settings",
    "route",
]
