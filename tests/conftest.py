"""Settings for the whole suite.

hypothesis's pytest plugin imports parts of hypothesis lazily, some of them while a
failure is being reported, and pytest compiles (rewrites) each module on its first
import. CPython 3.11's compiler fails with "AST constructor recursion depth mismatch"
when a garbage-collector finalizer runs in the middle of a compile, which turned a
failing test into an INTERNALERROR that hid the failure. Importing them here, at
collection, keeps every compile of theirs out of the reporting path."""

import hypothesis.internal.observability  # noqa: F401
