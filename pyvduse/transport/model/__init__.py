"""An in-process model of VDUSE's kernel half, for fast tests and fault injection."""
