"""Prepare: a slide pair reduced to the stain-agnostic tissue images the registration compares, on one working grid."""
