"""``outbox bench``: measure the project next to the machine's own limits, in the same run."""
