"""`--check`: the experiment planned, built and read as a run would, on this machine, with one line
per problem."""
