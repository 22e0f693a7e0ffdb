//! Sessions kept between a server's requests with the tokens their KV caches hold, so that a request whose
//! prompt begins with those tokens — the system prompt, the earlier turns of a chat — feeds only the rest
//! (as llama-server's slots do). At most one session per request slot is kept; each is lent to one request
//! at a time.

use std::sync::Mutex;

use q3c_runtime::Session;

/// Opens a session with room for this many tokens.
pub type OpenSession = Box<dyn Fn(usize) -> Box<dyn Session + Send> + Send + Sync>;

/// A session lent to a request.
pub struct Lease {
    pub session: Box<dyn Session + Send>,
    /// Tokens its KV cache holds (a prefix of the request's prompt).
    pub cached: usize,
    capacity: usize,
}

struct Kept {
    session: Box<dyn Session + Send>,
    tokens: Vec<u32>,
    capacity: usize,
    last_used: u64,
}

/// The kept sessions of one model.
pub struct PromptCache {
    open: OpenSession,
    /// Most sessions kept (and KV caches held) at once.
    limit: usize,
    /// Largest capacity a session gets (the model's context).
    context: usize,
    kept: Mutex<(Vec<Kept>, u64)>,
}

impl PromptCache {
    pub fn new(open: OpenSession, limit: usize, context: usize) -> PromptCache {
        PromptCache {
            open,
            limit,
            context,
            kept: Mutex::new((Vec::new(), 0)),
        }
    }

    /// A session for `prompt` with room for `needed` tokens: the kept one sharing the longest prefix with
    /// it (truncated to that prefix, and always leaving one prompt token to feed), or a new one when none
    /// shares anything and there is room to keep another.
    pub fn take(&self, prompt: &[u32], needed: usize) -> Lease {
        let best = {
            let mut guard = self.kept.lock().unwrap_or_else(|e| e.into_inner());
            let kept = &mut guard.0;
            let shared =
                |k: &Kept| common_prefix(&k.tokens, prompt).min(prompt.len().saturating_sub(1));
            let fits: Vec<usize> = (0..kept.len())
                .filter(|&i| kept[i].capacity >= needed)
                .collect();
            let best = fits
                .iter()
                .copied()
                .max_by_key(|&i| (shared(&kept[i]), kept[i].last_used));
            match best {
                Some(i) if shared(&kept[i]) > 0 || kept.len() >= self.limit => {
                    let k = kept.swap_remove(i);
                    Some((shared(&k), k))
                }
                _ => {
                    // Make room for the new session's cache: drop the least recently used.
                    if kept.len() >= self.limit {
                        if let Some(i) = (0..kept.len()).min_by_key(|&i| kept[i].last_used) {
                            kept.swap_remove(i);
                        }
                    }
                    None
                }
            }
        };
        match best {
            Some((cached, mut k)) => {
                k.session.truncate(cached);
                Lease {
                    session: k.session,
                    cached,
                    capacity: k.capacity,
                }
            }
            None => {
                // The whole context: a session's cache grows with the tokens it holds, so this costs
                // memory only as a conversation uses it, and every later request fits.
                let capacity = self.context.max(needed);
                Lease {
                    session: (self.open)(capacity),
                    cached: 0,
                    capacity,
                }
            }
        }
    }

    /// Keeps a lent session again, its cache holding `fed` (the prompt and the ids after it, cut to what the
    /// session holds); `None` after a failure, when the cache's contents are unknown.
    pub fn give_back(&self, mut lease: Lease, fed: Option<Vec<u32>>) {
        let tokens = match fed {
            Some(mut t) => {
                t.truncate(lease.session.position());
                t
            }
            None => {
                lease.session.reset();
                Vec::new()
            }
        };
        let mut guard = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        guard.1 += 1;
        let last_used = guard.1;
        if guard.0.len() < self.limit {
            guard.0.push(Kept {
                session: lease.session,
                tokens,
                capacity: lease.capacity,
                last_used,
            });
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
