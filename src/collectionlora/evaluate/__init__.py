"""Evaluation of edits: the effect judge."""
