"""Algorithms written as controller programs: a step function over named stages."""
