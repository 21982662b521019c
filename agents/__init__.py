"""Agents built on burnin: networks, the R2D2 learner and actor, environments and demos."""
