"""Kubernetes plumbing shared by the policy source and the identity resolvers: client configuration, the
list/watch reflector, the status writer and leader election. Never imported by `egress_gateway.policy`.
"""
