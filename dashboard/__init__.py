"""`orderflow dashboard`: a read-mostly operations site over the reporting views."""
