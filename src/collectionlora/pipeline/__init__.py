"""The Kubeflow pipeline's side of the library: what its components call beyond the stages (parameters
for a task, the distillation task, KFP outputs), compiling it, running it locally and on a cluster."""
