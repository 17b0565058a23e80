"""The data stage: sources, filters, deduplication, mixtures and tokenized shards."""
