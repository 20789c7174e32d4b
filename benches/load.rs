//! `cargo bench --bench load`: the service under load next to its peers (issue 12): the job
//! queue against graphile-worker on the same Postgres, the HTTP API under a real load
//! generator, memory and start-up time. Being written; prints nothing yet.

fn main() {}
