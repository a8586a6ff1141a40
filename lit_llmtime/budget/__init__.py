"""The FLOP budget: the ledger, a run's predicted cost, the gates and the ``FlopBudget`` callback."""
