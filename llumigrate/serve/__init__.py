"""`llumigrate serve`: N instances behind one OpenAI endpoint and a gRPC
control API, with the global scheduler dispatching and migrating between them.

The shell around the pure policy core (`llumigrate.scheduler`): it turns the
`Cluster`'s state into snapshots, runs dispatch and migration rounds, and
adapts the cluster to the frontend's and the control API's backends."""
