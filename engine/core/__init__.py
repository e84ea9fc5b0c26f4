"""The pure core: specs, commands, events, run state, ``decide`` and ``evolve``.

Nothing in this package does I/O, reads a clock or draws random numbers: time and
ids arrive as arguments or on records, so live processing and replay are the same
computation.
"""
