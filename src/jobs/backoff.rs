//! Retry delays: exponential from a base, capped, with "full jitter" so that many jobs failing
//! together (an AWS throttling burst) do not retry in lockstep.

use std::time::Duration;

use rand::Rng;

pub const MAX_DELAY: Duration = Duration::from_secs(600);

/// The upper bound of the delay before attempt `attempt + 1` (attempt counts from 1).
pub fn ceiling(base: Duration, attempt: i32) -> Duration {
    let exponent = attempt.clamp(1, 30) as u32 - 1;
    base.saturating_mul(2u32.saturating_pow(exponent))
        .min(MAX_DELAY)
}

/// A delay drawn uniformly from [ceiling/2, ceiling]: half is guaranteed spacing, half jitter.
pub fn delay(base: Duration, attempt: i32) -> Duration {
    let top = ceiling(base, attempt);
    let half = top / 2;
    let jitter_ms = rand::rng().random_range(0..=(top - half).as_millis() as u64);
    half + Duration::from_millis(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_per_attempt_and_caps() {
        let base = Duration::from_secs(2);
        let got: Vec<u64> = (1..=6).map(|a| ceiling(base, a).as_secs()).collect();
        assert_eq!(got, vec![2, 4, 8, 16, 32, 64]);
        assert_eq!(ceiling(base, 20), MAX_DELAY);
    }

    #[test]
    fn delay_stays_within_half_and_full_ceiling() {
        let base = Duration::from_millis(100);
        for attempt in 1..=8 {
            let top = ceiling(base, attempt);
            for _ in 0..200 {
                let d = delay(base, attempt);
                assert!(
                    d >= top / 2 && d <= top,
                    "attempt {attempt}: {d:?} outside [{:?}, {top:?}]",
                    top / 2
                );
            }
        }
    }
}
