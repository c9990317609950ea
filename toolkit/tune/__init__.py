"""Per-device kernel tuning: extract the kernels of a model, tune them with MetaSchedule, keep winners."""
