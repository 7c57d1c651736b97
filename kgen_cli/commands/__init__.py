"""One module per `kgen` sub-command; each is a thin adapter over the library modules."""
