"""The MLflow model registry end of the workflow: the student as a pyfunc model, registration with
lineage, the gate-and-champion rule, promotion, and the local UI server."""
