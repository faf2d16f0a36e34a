"""workers: the collector side. One process body per collector; never imports collectord."""
