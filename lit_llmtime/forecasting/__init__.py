"""Forecasts: the ``Forecaster``, metrics, reference forecasters, evaluation, plots and the writer."""
