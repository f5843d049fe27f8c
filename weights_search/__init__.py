"""Blend-weight optimisation: pure maths on arrays (numpy and scipy in, arrays out).

It imports nothing else of ens, so it can be reused and tested on its own.
"""
