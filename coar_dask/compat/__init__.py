"""The research code's settings and rules, in one place.
"""
