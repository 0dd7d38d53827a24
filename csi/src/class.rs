//! Which VolumeSnapshotClass a volume's snapshot uses. Pure; the rules, in order:
//!
//! 1. An explicit class (the volume's entry in `volumeClasses`, else the session's
//!    `className`) is used when it exists and belongs to the volume's CSI driver.
//! 2. Otherwise the one class of that driver annotated
//!    `snapshot.storage.kubernetes.io/is-default-class: "true"`.
//! 3. No such class, or more than one, is a [`ClassError`] that names the driver and the
//!    classes seen. The caller decides whether that fails the volume or (only when the
//!    configuration says `fallback: Live`) reads the live mount — never silently.

use std::fmt;

use crate::types::VolumeSnapshotClass;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassError {
    /// The explicit class does not exist (it may be created later: retryable).
    NotFound { class: String },
    /// The explicit class belongs to another driver.
    WrongDriver { class: String, class_driver: String, driver: String },
    /// No explicit class and no default for the driver; `seen` are the driver's classes.
    NoDefault { driver: String, seen: Vec<String> },
    /// More than one default class for the driver.
    SeveralDefaults { driver: String, defaults: Vec<String> },
}

impl ClassError {
    /// Whether waiting may help (the named class may yet be created).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClassError::NotFound { .. })
    }
}

impl fmt::Display for ClassError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClassError::NotFound { class } => write!(f, "VolumeSnapshotClass {class} does not exist"),
            ClassError::WrongDriver { class, class_driver, driver } => write!(
                f,
                "VolumeSnapshotClass {class} is for driver {class_driver}, but the volume's driver is {driver}"
            ),
            ClassError::NoDefault { driver, seen } if seen.is_empty() => write!(
                f,
                "no VolumeSnapshotClass for CSI driver {driver}; create one (annotated \
                 {}: \"true\") or name one in volumeSnapshot.className",
                crate::types::DEFAULT_CLASS_ANNOTATION
            ),
            ClassError::NoDefault { driver, seen } => write!(
                f,
                "no default VolumeSnapshotClass for CSI driver {driver} (its classes: {}); annotate one \
                 {}: \"true\" or name one in volumeSnapshot.className",
                seen.join(", "),
                crate::types::DEFAULT_CLASS_ANNOTATION
            ),
            ClassError::SeveralDefaults { driver, defaults } => write!(
                f,
                "{} VolumeSnapshotClasses are the default for CSI driver {driver} ({}); keep one default \
                 or name one in volumeSnapshot.className",
                defaults.len(),
                defaults.join(", ")
            ),
        }
    }
}

impl std::error::Error for ClassError {}

/// The class for a volume of CSI driver `driver`, given the explicit choice (if any) and every
/// VolumeSnapshotClass of the cluster.
pub fn select_class(
    explicit: Option<&str>,
    driver: &str,
    classes: &[VolumeSnapshotClass],
) -> Result<String, ClassError> {
    if let Some(name) = explicit {
        let class = classes
            .iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| ClassError::NotFound { class: name.to_string() })?;
        if class.driver != driver {
            return Err(ClassError::WrongDriver {
                class: name.to_string(),
                class_driver: class.driver.clone(),
                driver: driver.to_string(),
            });
        }
        return Ok(name.to_string());
    }
    let mut of_driver: Vec<&VolumeSnapshotClass> = classes.iter().filter(|c| c.driver == driver).collect();
    of_driver.sort_by(|a, b| a.name().cmp(b.name()));
    let defaults: Vec<String> = of_driver.iter().filter(|c| c.is_default()).map(|c| c.name().to_string()).collect();
    match defaults.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ClassError::NoDefault {
            driver: driver.to_string(),
            seen: of_driver.iter().map(|c| c.name().to_string()).collect(),
        }),
        _ => Err(ClassError::SeveralDefaults { driver: driver.to_string(), defaults }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::DEFAULT_CLASS_ANNOTATION;

    fn class(name: &str, driver: &str, default: Option<&str>) -> VolumeSnapshotClass {
        let mut c =
            VolumeSnapshotClass { driver: driver.into(), deletion_policy: "Delete".into(), ..Default::default() };
        c.metadata.name = Some(name.into());
        if let Some(v) = default {
            c.metadata.annotations = Some([(DEFAULT_CLASS_ANNOTATION.to_string(), v.to_string())].into());
        }
        c
    }

    #[test]
    fn explicit_class_wins_over_the_default() {
        let classes = [class("fast", "d", None), class("std", "d", Some("true"))];
        assert_eq!(select_class(Some("fast"), "d", &classes), Ok("fast".into()));
    }

    #[test]
    fn explicit_class_must_exist_and_match_the_driver() {
        let classes = [class("other", "e", Some("true"))];
        let e = select_class(Some("gone"), "d", &classes).expect_err("missing");
        assert!(e.is_retryable());
        assert_eq!(e.to_string(), "VolumeSnapshotClass gone does not exist");
        let e = select_class(Some("other"), "d", &classes).expect_err("wrong driver");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("is for driver e, but the volume's driver is d"), "{e}");
    }

    #[test]
    fn the_drivers_one_default_is_chosen() {
        let classes = [
            class("a-default-of-another-driver", "e", Some("true")),
            class("plain", "d", None),
            class("not-quite", "d", Some("True ")),
            class("chosen", "d", Some("true")),
        ];
        assert_eq!(select_class(None, "d", &classes), Ok("chosen".into()));
    }

    #[test]
    fn no_default_names_the_driver_and_its_classes() {
        let classes = [class("b", "d", None), class("a", "d", Some("false")), class("x", "e", Some("true"))];
        let e = select_class(None, "d", &classes).expect_err("no default");
        assert_eq!(e, ClassError::NoDefault { driver: "d".into(), seen: vec!["a".into(), "b".into()] });
        assert!(e.to_string().contains("CSI driver d (its classes: a, b)"), "{e}");
        let e = select_class(None, "d", &[]).expect_err("none at all");
        assert!(e.to_string().starts_with("no VolumeSnapshotClass for CSI driver d"), "{e}");
    }

    #[test]
    fn two_defaults_are_refused_not_guessed() {
        let classes = [class("y", "d", Some("true")), class("x", "d", Some("true"))];
        let e = select_class(None, "d", &classes).expect_err("two defaults");
        assert_eq!(e, ClassError::SeveralDefaults { driver: "d".into(), defaults: vec!["x".into(), "y".into()] });
        assert!(e.to_string().contains("2 VolumeSnapshotClasses are the default for CSI driver d (x, y)"), "{e}");
    }
}
