"""Framework glue.  `zo_kernels.integrations.hf`: ZOTrainer (transformers.Trainer with MeZO / MeZO-SVRG).

Imported lazily, so zo_kernels itself does not need transformers."""
