"""The forgetting report of a run (or two runs compared): tables, plots and the `jaxcpt report` command."""
