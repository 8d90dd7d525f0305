"""A trained export at work: predict, evaluate on a test split."""
