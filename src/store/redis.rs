//! Placeholder: the Redis store lands with the Redis issue.
