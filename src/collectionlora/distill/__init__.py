"""Multi-teacher on-policy distillation: AOP prompting, PDSR routing, C2F-DO losses and the trainer."""
