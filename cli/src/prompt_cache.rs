//! Sequences kept between a server's requests with the tokens their KV caches hold, so that a request whose
//! prompt begins with those tokens — the system prompt, the earlier turns of a chat — feeds only the rest.
//! A request gets a *fork* of the kept sequence sharing the longest prefix with its prompt
//! ([`BatchedSession::fork`]: the prefix's whole cache blocks are shared, not copied), so any number of
//! concurrent requests reuse one kept system prompt; when it ends, its own sequence is kept in turn.
//! At most one sequence per request slot is kept, the least recently used going first.

use std::sync::Mutex;

use q3c_runtime::{BatchedSession, Scheduler, Session};

/// A session lent to a request.
pub struct Lease {
    pub session: BatchedSession,
    /// Tokens its KV cache holds (a prefix of the request's prompt).
    pub cached: usize,
}

struct Kept {
    session: BatchedSession,
    tokens: Vec<u32>,
    last_used: u64,
}

/// The kept sequences of one scheduler.
pub struct PromptCache {
    scheduler: Scheduler,
    /// Most sequences kept at once.
    limit: usize,
    kept: Mutex<(Vec<Kept>, u64)>,
}

impl PromptCache {
    pub fn new(scheduler: Scheduler, limit: usize) -> PromptCache {
        PromptCache {
            scheduler,
            limit,
            kept: Mutex::new((Vec::new(), 0)),
        }
    }

    /// A session for `prompt`: a fork of the kept sequence sharing the longest prefix with it (always
    /// leaving one prompt token to feed), or a new one when none shares anything.
    pub fn take(&self, prompt: &[u32]) -> Lease {
        let mut guard = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        guard.1 += 1;
        let now = guard.1;
        let shared =
            |k: &Kept| common_prefix(&k.tokens, prompt).min(prompt.len().saturating_sub(1));
        let best = (0..guard.0.len()).max_by_key(|&i| (shared(&guard.0[i]), guard.0[i].last_used));
        if let Some(i) = best {
            let k = &mut guard.0[i];
            let cached = shared(k);
            if cached > 0 {
                if let Ok(session) = k.session.fork(cached) {
                    k.last_used = now;
                    return Lease { session, cached };
                }
            }
        }
        Lease {
            session: self.scheduler.session(),
            cached: 0,
        }
    }

    /// Keeps a lent session's sequence, its cache holding `fed` (the prompt and the ids after it, cut to
    /// what the session holds); `None` after a failure, when the cache's contents are unknown (dropped).
    pub fn give_back(&self, lease: Lease, fed: Option<Vec<u32>>) {
        lease.session.idle();
        let Some(mut tokens) = fed else {
            return;
        };
        tokens.truncate(lease.session.position());
        let mut guard = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        guard.1 += 1;
        let last_used = guard.1;
        // A kept sequence whose tokens this one begins with adds nothing any more.
        guard
            .0
            .retain(|k| common_prefix(&k.tokens, &tokens) < k.tokens.len());
        guard.0.push(Kept {
            session: lease.session,
            tokens,
            last_used,
        });
        if guard.0.len() > self.limit {
            if let Some(i) = (0..guard.0.len()).min_by_key(|&i| guard.0[i].last_used) {
                guard.0.swap_remove(i);
            }
        }
    }
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefixes() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
    }
}
