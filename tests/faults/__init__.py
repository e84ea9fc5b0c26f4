"""Fault-injection scenarios against a private Kafka broker and PostgreSQL cluster."""
