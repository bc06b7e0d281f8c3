"""The Policy feature: bundles of resource policies and derived roles, decided in-process."""
