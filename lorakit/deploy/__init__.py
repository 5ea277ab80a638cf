"""Deployment: merging an adapter into its base, and converting adapters to and from other formats."""
