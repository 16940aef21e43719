"""Checkpoint readers and writers: each format <-> a pure nested dict of arrays."""
