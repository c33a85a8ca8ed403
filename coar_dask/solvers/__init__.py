"""Streaming linear solvers behind one protocol: exact least squares (Gram /
CG), SAGA and fast_l1.
"""
