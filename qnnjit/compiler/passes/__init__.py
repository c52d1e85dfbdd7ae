"""One pass per module: a function `graph -> changed` with a docstring stating
what it rewrites and why the rewrite keeps every output integer unchanged."""
