"""Analyses over ``(n_samples, n_features)`` arrays (NumPy or Dask): factorization,
representational similarity and bias audits. Accumulation is in float64."""
