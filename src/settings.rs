//! One declaration per setting. [`settings!`](crate::settings!) turns a list of settings into:
//!
//! - the settings struct a pass runs with (read from a config's `[[stages]]` table by serde, and
//!   recorded in reports), with every field's default in its `Default`;
//! - the command-line flags that override it (a clap `Args` struct of `Option`s), whose `--help`
//!   text is the setting's doc comment followed by `[default: …]`;
//! - `Flags::apply`, which overlays the flags given on settings from a config or the defaults.
//!
//! Each field is one of:
//!
//! - `#[flag(clap args)] name: T = default, "shown default";`: a setting with a flag of the
//!   same name;
//! - `#[flag_opt(clap args)] name: T = default, "shown default";`: an optional setting
//!   (`Option<T>`, default `None` or the given value) with a flag;
//! - `#[switch_off(flag_name, "flag help")] name: bool = default, "shown default";`: a setting
//!   that a bare switch `--flag-name` turns off;
//! - `name: T = default, "shown default";`: a config key without a flag.
//!
//! A new setting is one such line (and its doc comment) where the pass reads it.

/// Declares a settings struct, its flags and its defaults from one list; see the module docs.
#[macro_export]
macro_rules! settings {
    (
        $(#[$settings_attr:meta])*
        pub struct $settings:ident;
        $(
            $(#[$flags_attr:meta])*
            pub struct $flags:ident;
        )?
        { $($body:tt)* }
    ) => {
        $crate::settings!(@field [
            [$(#[$settings_attr])*] $settings [$($(#[$flags_attr])*)?] [$($flags)?]
            fields[] flags[] defaults[] overlay[] keys[]
        ] $($body)*);
    };
    // Each kind of field says what it adds to each list, and `@push` adds it.
    (@field $state:tt $(#[doc = $doc:literal])*
        #[switch_off($flag:ident, $flag_doc:literal)] $name:ident : bool = $default:expr,
        $shown:literal; $($rest:tt)*
    ) => {
        $crate::settings!(@push $state [$(#[doc = $doc])*] $name [bool] $default, $shown;
            [#[doc = $flag_doc] #[arg(long)] pub $flag: bool,] (switch_off $name $flag)
            Some(concat!(stringify!($flag), " (turns it off)")); $($rest)*);
    };
    (@field $state:tt $(#[doc = $doc:literal])*
        $name:ident : $ty:ty = $default:expr, $shown:literal; $($rest:tt)*
    ) => {
        $crate::settings!(@push $state [$(#[doc = $doc])*] $name [$ty] $default, $shown;
            [] (config $name) None; $($rest)*);
    };
    // `flag` (a setting of type T) and `flag_opt` (of type Option<T>): both flags are Option<T>.
    (@field $state:tt $(#[doc = $doc:literal])*
        #[flag($($arg:tt)*)] $name:ident : $ty:ty = $default:expr, $shown:literal; $($rest:tt)*
    ) => {
        $crate::settings!(@flagged flag $state [$($doc)*] [$($arg)*] $name $ty, $default, $shown;
            $($rest)*);
    };
    (@field $state:tt $(#[doc = $doc:literal])*
        #[flag_opt($($arg:tt)*)] $name:ident : $ty:ty = $default:expr, $shown:literal;
        $($rest:tt)*
    ) => {
        $crate::settings!(@flagged flag_opt $state [$($doc)*] [$($arg)*] $name $ty, $default,
            $shown; $($rest)*);
    };
    (@flagged $kind:ident $state:tt [$($doc:literal)*] [$($arg:tt)*] $name:ident $ty:ty,
        $default:expr, $shown:literal; $($rest:tt)*
    ) => {
        $crate::settings!(@push $state [$(#[doc = $doc])*] $name
            [$crate::settings!(@type $kind $ty)] $default, $shown;
            [$(#[doc = $doc])*
                #[arg($($arg)*, help = $crate::settings::help(&[$($doc),*], $shown),
                    long_help = $crate::settings::help(&[$($doc),*], $shown))]
                pub $name: Option<$ty>,]
            ($kind $name) Some(stringify!($name)); $($rest)*);
    };
    (@type flag $ty:ty) => { $ty };
    (@type flag_opt $ty:ty) => { Option<$ty> };
    (@push [$sa:tt $s:ident $fa:tt $f:tt fields[$($fields:tt)*] flags[$($flag_fields:tt)*]
            defaults[$($defaults:tt)*] overlay[$($overlay:tt)*] keys[$($keys:tt)*]]
        [$(#[doc = $doc:literal])*] $name:ident [$($field_ty:tt)*] $default:expr, $shown:literal;
        [$($flag_field:tt)*] $entry:tt $key_flag:expr; $($rest:tt)*
    ) => {
        $crate::settings!(@field [$sa $s $fa $f
            fields[$($fields)* $(#[doc = $doc])* #[doc = concat!("[default: ", $shown, "]")]
                pub $name: $($field_ty)*,]
            flags[$($flag_fields)* $($flag_field)*]
            defaults[$($defaults)* $name: $default,]
            overlay[$($overlay)* $entry]
            keys[$($keys)* ($name, $key_flag, [$($doc),*], $shown)]
        ] $($rest)*);
    };
    (@value flag $me:tt $base:tt $name:ident) => {
        $me.$name.clone().unwrap_or($base.$name)
    };
    (@value flag_opt $me:tt $base:tt $name:ident) => {
        $me.$name.clone().or($base.$name)
    };
    (@value switch_off $me:tt $base:tt $name:ident $flag:ident) => {
        $base.$name && !$me.$flag
    };
    (@value config $me:tt $base:tt $name:ident) => {
        $base.$name
    };
    (@field [[$($sa:tt)*] $s:ident $fa:tt $f:tt
        fields[$($fields:tt)*] flags[$($flag_fields:tt)*] defaults[$($defaults:tt)*]
        overlay[$(($kind:ident $oname:ident $($oflag:ident)?))*]
        keys[$(($kname:ident, $kflag:expr, [$($kdoc:literal),*], $kshown:literal))*]
    ]) => {
        $($sa)*
        pub struct $s { $($fields)* }

        impl Default for $s {
            fn default() -> Self {
                $s { $($defaults)* }
            }
        }

        impl $s {
            /// Every setting, in declaration order: its config key, flag, doc and default.
            pub const KEYS: &'static [$crate::settings::Key] = &[$(
                $crate::settings::Key {
                    name: stringify!($kname),
                    flag: $kflag,
                    doc: &[$($kdoc),*],
                    default: $kshown,
                },
            )*];
        }

        $crate::settings!(@flags $fa $f $s; [$($flag_fields)*] [$(($kind $oname $($oflag)?))*]);
    };
    (@flags [] [] $s:ident; $flag_fields:tt $overlay:tt) => {};
    (@flags [$($fa:tt)*] [$f:ident] $s:ident; [$($flag_fields:tt)*]
        [$(($kind:ident $oname:ident $($oflag:ident)?))*]
    ) => {
        $($fa)*
        #[derive(Debug, Default, clap::Args)]
        pub struct $f { $($flag_fields)* }

        impl $f {
            /// `base` with every flag given here applied.
            pub fn apply(&self, base: $s) -> $s {
                $s { $($oname: $crate::settings!(@value $kind self base $oname $($oflag)?),)* }
            }
        }
    };
}

/// One setting as the reference docs describe it.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The config key.
    pub name: &'static str,
    /// The flag's name with underscores (`--` and hyphens are added when shown), if it has one.
    pub flag: Option<&'static str>,
    /// The doc comment's lines.
    pub doc: &'static [&'static str],
    /// The default, as shown.
    pub default: &'static str,
}

impl Key {
    /// The flag as typed (`--group-size`), if the setting has one.
    pub fn flag(&self) -> Option<String> {
        self.flag.map(|f| format!("--{}", f.replace('_', "-")))
    }

    /// The doc comment as one line.
    pub fn text(&self) -> String {
        joined(self.doc)
    }
}

/// Doc comment lines joined into one line, intra-doc links shown as code.
fn joined(doc: &[&str]) -> String {
    let text = doc
        .iter()
        .map(|line| line.trim())
        .collect::<Vec<_>>()
        .join(" ");
    text.replace("[`", "`").replace("`]", "`")
}

/// A Markdown table of `keys`: key, flag, default, meaning.
pub fn reference_table(keys: &[Key]) -> String {
    let mut table = String::from("| key | flag | default | meaning |\n|---|---|---|---|\n");
    for key in keys {
        let flag = key.flag().map_or("—".to_string(), |f| format!("`{f}`"));
        let cell = |s: &str| s.replace('|', "\\|");
        table += &format!(
            "| `{}` | {flag} | {} | {} |\n",
            key.name,
            cell(key.default),
            cell(&key.text())
        );
    }
    table
}

/// The `--help` text of a setting's flag: its doc comment's lines joined, then `[default: …]`.
pub fn help(doc: &[&str], shown: &str) -> clap::builder::StyledStr {
    let text = doc
        .iter()
        .map(|line| line.trim())
        .collect::<Vec<_>>()
        .join(" ");
    let text = text.replace("[`", "`").replace("`]", "`");
    format!("{text} [default: {shown}]").into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::attention::AttentionSettings;
    use crate::passes::bsp::BspSettings;
    use crate::passes::prune::{PruneFlags, PruneSettings};
    use crate::passes::quantize::QuantizeSettings;
    use crate::passes::shape::ShapeSettings;
    use crate::passes::vocab::VocabSettings;
    use crate::train::fit::TrainSettings;

    /// docs/settings.md as the declarations give it.
    fn reference() -> String {
        let mut page = String::from(
            "# Stage settings\n\nGenerated from the declarations in the code (`settings!` in \
             `src/passes/` and `src/train/`) by `AXCOMPRESS_UPDATE_DOCS=1 cargo test --lib settings`; a test fails \
             when this page and the code differ. Each key is a `[[stages]]` key of a `compress` \
             config; a flag, where there is one, sets it on the command line (under `compress`, \
             for every stage of that pass).\n",
        );
        for (pass, keys) in [
            ("prune", PruneSettings::KEYS),
            ("quantize", QuantizeSettings::KEYS),
            ("recover", TrainSettings::KEYS),
            ("bsp", BspSettings::KEYS),
            ("attention", AttentionSettings::KEYS),
            ("shape", ShapeSettings::KEYS),
            ("vocab", VocabSettings::KEYS),
        ] {
            page += &format!("\n## `pass = \"{pass}\"`\n\n{}", reference_table(keys));
        }
        page
    }

    #[test]
    fn the_settings_reference_is_generated_from_the_declarations() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/settings.md");
        if std::env::var_os("AXCOMPRESS_UPDATE_DOCS").is_some() {
            std::fs::write(&path, reference()).unwrap();
        }
        let written = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            written == reference(),
            "docs/settings.md is not what the code declares: run AXCOMPRESS_UPDATE_DOCS=1 cargo test --lib settings"
        );
    }

    /// Whether `shown` says `value`, where a plain value can say it: numbers, booleans, names and
    /// lists of names (`blocks,heads,groups`) or JSON; `None` where it cannot (unset options,
    /// tables).
    fn says(shown: &str, value: &serde_json::Value) -> Option<bool> {
        use serde_json::Value;
        if serde_json::from_str::<Value>(shown).ok().as_ref() == Some(value) {
            return Some(true);
        }
        match value {
            Value::Number(n) => Some(shown.parse::<f64>().ok() == n.as_f64()),
            Value::Bool(b) => Some(shown.parse::<bool>().ok() == Some(*b)),
            Value::String(s) => Some(shown == s),
            Value::Array(items) if items.iter().all(Value::is_string) => {
                let names: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
                Some(shown == names.join(","))
            }
            _ => None,
        }
    }

    fn check_shown_defaults<T: Default + serde::Serialize>(keys: &[Key]) -> usize {
        let defaults = serde_json::to_value(T::default()).unwrap();
        let mut checked = 0;
        for key in keys {
            if let Some(same) = says(key.default, &defaults[key.name]) {
                assert!(
                    same,
                    "{}: shown {:?}, is {}",
                    key.name, key.default, defaults[key.name]
                );
                checked += 1;
            }
        }
        checked
    }

    #[test]
    fn the_defaults_shown_in_help_and_docs_are_the_defaults() {
        let checked = check_shown_defaults::<PruneSettings>(PruneSettings::KEYS)
            + check_shown_defaults::<QuantizeSettings>(QuantizeSettings::KEYS)
            + check_shown_defaults::<TrainSettings>(TrainSettings::KEYS)
            + check_shown_defaults::<BspSettings>(BspSettings::KEYS)
            + check_shown_defaults::<AttentionSettings>(AttentionSettings::KEYS)
            + check_shown_defaults::<ShapeSettings>(ShapeSettings::KEYS)
            + check_shown_defaults::<VocabSettings>(VocabSettings::KEYS);
        assert!(checked >= 30, "only {checked} defaults could be checked");
        assert_eq!(says("2", &serde_json::json!(3)), Some(false));
    }

    #[test]
    fn flags_given_override_the_base_and_unset_flags_keep_it() {
        let base = PruneSettings {
            group_size: 64,
            budget: Some(3),
            calibration: 7,
            ..PruneSettings::default()
        };
        let flags = PruneFlags {
            patience: Some(5),
            budget: Some(9),
            ..PruneFlags::default()
        };
        let applied = flags.apply(base.clone());
        assert_eq!(applied.patience, 5);
        assert_eq!(applied.budget, Some(9));
        assert_eq!(applied.group_size, 64);
        assert_eq!(applied.calibration, 7);
        assert_eq!(PruneFlags::default().apply(base.clone()), base);
    }

    #[test]
    fn a_switch_turns_its_setting_off_and_leaves_it_alone_when_absent() {
        use crate::passes::quantize::QuantizeFlags;
        let on = QuantizeSettings::default();
        assert!(on.embeddings && on.compare);
        let off = QuantizeFlags {
            float_embeddings: true,
            ..QuantizeFlags::default()
        }
        .apply(on.clone());
        assert!(!off.embeddings && off.compare);
        assert_eq!(QuantizeFlags::default().apply(on.clone()), on);
    }

    #[test]
    fn help_ends_with_the_default() {
        let text = help(&[" Cap on removals", " ([`Level`])."], "no cap").to_string();
        assert_eq!(text, "Cap on removals (`Level`). [default: no cap]");
    }
}
