"""A run: planned once, assembled once (the session), stepped by one train step, followed by one
ordered list of outputs."""
