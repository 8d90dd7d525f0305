"""A trained export at work: predict, evaluate on a test split, the commands both command lines
share, and the engine-free part of serving (a replica's batch of requests)."""
