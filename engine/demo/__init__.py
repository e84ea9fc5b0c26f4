"""The refund-agent demo: a realistic agent workflow on the embedded backend."""
