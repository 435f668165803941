"""Operator workflows over a running deployment: delete posts, re-embed with a new backbone, re-classify with a
new head."""
