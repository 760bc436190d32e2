"""The saelab Dash app: reads a run directory; never trains or harvests by itself."""
