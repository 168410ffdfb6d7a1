//! Reboot windows: `--window-start "Thu 23:00"` (weekly) or `"23:00"` (daily) plus a
//! length, in the machine's local time. Parsing and "inside now? / how long until the
//! next start?" are pure functions of a [`LocalTime`]; only [`LocalTime::now`] reads the clock.
use std::time::Duration;

const DAY: u64 = 24 * 3600;
const WEEK: u64 = 7 * DAY;
const WEEKDAYS: [&str; 7] = [
    "sunday",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
];

/// A wall-clock instant in the local time zone, reduced to what windows need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// 0 = Sunday … 6 = Saturday (as `tm_wday`).
    pub weekday: u8,
    /// Seconds since local midnight.
    pub secs_of_day: u32,
}

impl LocalTime {
    /// `weekday` 0 = Sunday; panics on out-of-range values (a programming error).
    pub fn new(weekday: u8, hour: u32, minute: u32, second: u32) -> LocalTime {
        assert!(weekday < 7 && hour < 24 && minute < 60 && second < 61);
        LocalTime {
            weekday,
            secs_of_day: hour * 3600 + minute * 60 + second,
        }
    }

    /// The current local time, as the C library sees the machine's time zone.
    pub fn now() -> LocalTime {
        let t: libc::time_t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as libc::time_t)
            .unwrap_or(0);
        // SAFETY: localtime_r only writes into `tm`, which we own; nothing in this
        // program changes TZ while it runs.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
        if !ok {
            // No usable zone information: UTC is the only defensible fallback.
            let secs = t as u64;
            return LocalTime {
                weekday: ((secs / DAY + 4) % 7) as u8, // 1970-01-01 was a Thursday
                secs_of_day: (secs % DAY) as u32,
            };
        }
        LocalTime::new(
            tm.tm_wday as u8,
            tm.tm_hour as u32,
            tm.tm_min as u32,
            tm.tm_sec.min(60) as u32,
        )
    }

    fn secs_of_week(self) -> u64 {
        self.weekday as u64 * DAY + self.secs_of_day as u64
    }
}

/// A recurring reboot window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Seconds from the start of the period (Sunday 00:00, or midnight) to the start.
    start: u64,
    /// `DAY` or `WEEK`.
    period: u64,
    /// How long the window stays open; `0 < length <= period`.
    length: u64,
}

/// Why a window specification was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WindowError {
    /// The start is not `[Weekday ]HH:MM`.
    #[error(
        "invalid window start {0:?}: expected \"HH:MM\" or \"Day HH:MM\" (e.g. \"Thu 23:00\")"
    )]
    Start(String),
    /// The weekday is not an English day name or its three-letter abbreviation.
    #[error("invalid window start {start:?}: unknown weekday {day:?}")]
    Weekday { start: String, day: String },
    /// The length is zero or longer than the period the window repeats in.
    #[error("invalid window length {length}: must be more than 0 and at most {max}")]
    Length { length: String, max: &'static str },
}

impl Window {
    /// Parses a start (`"Thu 23:00"`: weekly; `"23:00"`: daily) and a length.
    pub fn parse(start: &str, length: Duration) -> Result<Window, WindowError> {
        let bad = || WindowError::Start(start.to_string());
        let mut parts = start.split_whitespace();
        let (day, time) = match (parts.next(), parts.next(), parts.next()) {
            (Some(t), None, None) => (None, t),
            (Some(d), Some(t), None) => (Some(d), t),
            _ => return Err(bad()),
        };
        let (h, m) = time.split_once(':').ok_or_else(bad)?;
        let digits = |s: &str| s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit());
        if !(digits(h) || h.len() == 1 && digits(&format!("0{h}"))) || !digits(m) {
            return Err(bad());
        }
        let (h, m): (u64, u64) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        let time_of_day = h * 3600 + m * 60;
        let (start_secs, period, max) = match day {
            None => (time_of_day, DAY, "24h"),
            Some(d) => {
                let lower = d.to_ascii_lowercase();
                let idx = WEEKDAYS
                    .iter()
                    .position(|w| *w == lower || (lower.len() == 3 && w.starts_with(&lower)))
                    .ok_or_else(|| WindowError::Weekday {
                        start: start.to_string(),
                        day: d.to_string(),
                    })?;
                (idx as u64 * DAY + time_of_day, WEEK, "7days")
            }
        };
        let secs = length.as_secs();
        if secs == 0 || secs > period {
            return Err(WindowError::Length {
                length: humantime::format_duration(length).to_string(),
                max,
            });
        }
        Ok(Window {
            start: start_secs,
            period,
            length: secs,
        })
    }

    /// Seconds since the most recent start (in `0..period`).
    fn since_start(&self, now: LocalTime) -> u64 {
        let pos = now.secs_of_week() % self.period;
        (pos + self.period - self.start) % self.period
    }

    /// Whether `now` is inside the window (start inclusive, end exclusive).
    pub fn contains(&self, now: LocalTime) -> bool {
        self.since_start(now) < self.length
    }

    /// How long the window stays open from `now`, or `None` when it is closed.
    pub fn remaining(&self, now: LocalTime) -> Option<Duration> {
        let since = self.since_start(now);
        (since < self.length).then(|| Duration::from_secs(self.length - since))
    }

    /// How long until the window is open: zero inside it, else until the next start.
    pub fn until_open(&self, now: LocalTime) -> Duration {
        let since = self.since_start(now);
        if since < self.length {
            Duration::ZERO
        } else {
            Duration::from_secs(self.period - since)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THU: u8 = 4;
    const SAT: u8 = 6;
    const SUN: u8 = 0;
    const MON: u8 = 1;

    fn hm(h: u64, m: u64) -> Duration {
        Duration::from_secs(h * 3600 + m * 60)
    }

    #[test]
    fn window_weekly_thursday_evening() {
        let w = Window::parse("Thu 23:00", humantime::parse_duration("1h30m").unwrap()).unwrap();
        assert!(!w.contains(LocalTime::new(THU, 22, 59, 59)));
        assert_eq!(
            w.until_open(LocalTime::new(THU, 22, 59, 0)),
            Duration::from_secs(60)
        );
        assert!(w.contains(LocalTime::new(THU, 23, 0, 0)));
        assert_eq!(w.remaining(LocalTime::new(THU, 23, 0, 0)), Some(hm(1, 30)));
        // Crosses midnight into Friday.
        assert!(w.contains(LocalTime::new(THU + 1, 0, 29, 59)));
        assert!(!w.contains(LocalTime::new(THU + 1, 0, 30, 0)));
        assert_eq!(w.remaining(LocalTime::new(THU + 1, 0, 30, 0)), None);
        // Just after it closed: a week minus the length.
        assert_eq!(
            w.until_open(LocalTime::new(THU + 1, 0, 30, 0)),
            hm(7 * 24 - 2, 30)
        );
        assert_eq!(w.until_open(LocalTime::new(MON, 23, 0, 0)), hm(72, 0));
        // Case and full names are accepted.
        assert_eq!(
            Window::parse("thursday 23:00", hm(1, 30)).unwrap(),
            w.clone()
        );
    }

    #[test]
    fn window_crossing_the_week_end() {
        let w = Window::parse("Sat 22:00", hm(28, 0)).unwrap();
        assert!(w.contains(LocalTime::new(SAT, 22, 0, 0)));
        assert!(w.contains(LocalTime::new(SUN, 12, 0, 0)));
        assert!(w.contains(LocalTime::new(MON, 1, 59, 59)));
        assert!(!w.contains(LocalTime::new(MON, 2, 0, 0)));
        assert_eq!(w.remaining(LocalTime::new(SUN, 0, 0, 0)), Some(hm(26, 0)));
        assert_eq!(
            w.until_open(LocalTime::new(MON, 2, 0, 0)),
            hm(5 * 24 + 20, 0)
        );
        assert_eq!(w.until_open(LocalTime::new(SAT, 21, 0, 0)), hm(1, 0));
    }

    #[test]
    fn window_daily_crossing_midnight() {
        let w = Window::parse("23:00", hm(2, 0)).unwrap();
        for day in 0..7 {
            assert!(w.contains(LocalTime::new(day, 23, 30, 0)));
            assert!(w.contains(LocalTime::new(day, 0, 59, 0)));
            assert!(!w.contains(LocalTime::new(day, 1, 0, 0)));
            assert_eq!(w.until_open(LocalTime::new(day, 1, 0, 0)), hm(22, 0));
            assert_eq!(w.remaining(LocalTime::new(day, 0, 30, 0)), Some(hm(0, 30)));
        }
        let whole_day = Window::parse("4:05", hm(24, 0)).unwrap();
        assert!(whole_day.contains(LocalTime::new(MON, 4, 4, 59)));
    }

    #[test]
    fn window_rejects_invalid_input() {
        let one_hour = hm(1, 0);
        for bad in [
            "",
            "23",
            "24:00",
            "23:60",
            "Thu",
            "Thu 23:00 x",
            "23:0",
            "a:bc",
            "-1:00",
        ] {
            assert_eq!(
                Window::parse(bad, one_hour),
                Err(WindowError::Start(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(
            Window::parse("Thx 23:00", one_hour),
            Err(WindowError::Weekday {
                start: "Thx 23:00".into(),
                day: "Thx".into()
            })
        );
        assert!(matches!(
            Window::parse("23:00", Duration::ZERO),
            Err(WindowError::Length { .. })
        ));
        assert!(matches!(
            Window::parse("23:00", hm(25, 0)),
            Err(WindowError::Length { max: "24h", .. })
        ));
        assert!(Window::parse("Thu 23:00", hm(7 * 24, 0)).is_ok());
        assert!(Window::parse("Thu 23:00", hm(7 * 24 + 1, 0)).is_err());
    }
}
