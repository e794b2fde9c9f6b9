"""stale-bench sections: each module measures one thing and returns rows."""
