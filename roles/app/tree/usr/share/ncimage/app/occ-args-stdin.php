<?php
// ncimage app role: appends command-line arguments read from standard input to occ's argv.
//
// `occ maintenance:install` takes the database and admin passwords only as options
// (--database-pass, --admin-pass) or from an interactive prompt: Nextcloud reads them from no
// file and no environment variable. On a command line they would be visible to every user in
// ps(1) (/proc/PID/cmdline). The join step 20-install.sh therefore runs
//
//     php -d auto_prepend_file=/usr/share/ncimage/app/occ-args-stdin.php occ maintenance:install -n
//
// and writes the remaining options, secrets included, as one JSON array of strings to its
// standard input. This file runs before occ (in the global scope) and appends them to $argv and
// $_SERVER['argv'], which occ reads (Symfony's ArgvInput). occ then finds standard input at its
// end: give it --no-interaction. Nothing is printed; a malformed input stops PHP with exit 2.
if (PHP_SAPI === 'cli') {
    $ncimage_args = json_decode((string)stream_get_contents(STDIN), true);
    if (!is_array($ncimage_args) || !array_is_list($ncimage_args)
        || count(array_filter($ncimage_args, 'is_string')) !== count($ncimage_args)) {
        fwrite(STDERR, "occ-args-stdin.php: standard input must be one JSON array of strings\n");
        exit(2);
    }
    $argv = array_merge($argv, $ncimage_args);
    $argc = count($argv);
    $_SERVER['argv'] = $argv;
    $_SERVER['argc'] = $argc;
    unset($ncimage_args);
}
