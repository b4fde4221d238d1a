"""The search for the smallest, fastest model that meets a team's targets: the goal and the choice,
the ladder of candidate students, successive halving, measurement, and the search run itself.

Import the modules themselves (this package re-exports nothing).
"""
