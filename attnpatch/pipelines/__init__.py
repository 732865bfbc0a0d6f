"""Front-end helpers still to be sorted (issue 17): CLI runners, metrics, profile tools, tiny test models."""
