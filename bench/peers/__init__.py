"""Peer engines measured beside Terranoha (DBOS Transact, Restate).

Peers are installed into their own virtual environment and folder under
``.local/bench-peers/``, never into the project's dependencies: see ``venv.py``.
"""
